"""Entry point, LDM style: ``python main.py --base configs/autoencoder/litevae.yaml -t``."""
import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main())
