"""Data: benchmark and dataset loaders (sources), the synthetic task (synthetic)."""
