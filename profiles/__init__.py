"""Data shipped with ditplan: hardware, clusters, models, published measurements."""
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
