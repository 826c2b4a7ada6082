"""pytest plugin entry point for vmk.testing (fixtures are added as the kit grows)."""
