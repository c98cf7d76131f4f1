"""Generated from proto/ by tools/gen_protos.py (`make protos`); do not edit."""
