"""`mmbatch audit`: label errors and mismatched pairs from cross-validated models (docs/audit.md)."""
