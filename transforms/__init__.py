"""Reusable Apache Beam transforms and the pure logic they call."""
