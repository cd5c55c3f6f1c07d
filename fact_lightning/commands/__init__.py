"""What the non-Lightning commands share: option declarations (``options``) and terminal output (``console``)."""
