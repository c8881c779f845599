"""Pluggy hook specifications and the plugin manager (project name and entry-point group `multilora_plugin`).

Empty in this release: host-application hooks are specified in a later version.
"""
