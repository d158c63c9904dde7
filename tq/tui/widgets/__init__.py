"""Widgets of ``tq top`` that are not whole views: one per module."""
