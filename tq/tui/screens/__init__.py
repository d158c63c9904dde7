"""Modal screens of ``tq top``: task detail, confirmation, help."""
