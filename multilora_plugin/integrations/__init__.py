"""Integrations with host applications (HTTP server, PEFT models, ...).

Empty in this release.
"""
