"""Allow ``python -m cmw_vllm``."""

from cmw_vllm.cli import main

if __name__ == "__main__":
    main()
