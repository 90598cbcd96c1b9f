"""mixins."""
