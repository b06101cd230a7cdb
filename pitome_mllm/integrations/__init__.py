"""Other frameworks' model interfaces, wrapping a patched model."""
