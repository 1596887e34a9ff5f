"""Example run configs (YAML), shipped as package data so `ecl demo` finds its config anywhere."""
