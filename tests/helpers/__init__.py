"""Test helpers: real components started on free loopback ports."""
