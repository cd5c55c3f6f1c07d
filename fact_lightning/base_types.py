"""The base model families FACT adapters are trained on, and how our adapter files name them.

Names only (no model library is imported), so that a console script can check its options before torch loads.
"""

SD15, SDXL = "sd15", "sdxl"
BASE_TYPES = (SD15, SDXL)
LABELS = {SD15: "SD1.5", SDXL: "SDXL"}
# The metadata key of our adapter files (models.adapter_io.save_adapter); a file without it is SD1.5's.
BASE_TYPE_KEY = "base_type"
