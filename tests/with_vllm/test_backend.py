"""`backend: vllm` in a system YAML: the same answers, finish reasons and token counts as backend hf."""

from vllm_helpers import run_driver


def test_backend_vllm_system_answers_like_the_hf_one(tmp_path):
    result = run_driver("driver_backend.py", out_dir=tmp_path)
    assert len(result["vllm"]) == len(result["hf"]) >= 4
    assert result["vllm"] == result["hf"]
    assert any(c["text"] for c in result["hf"])
