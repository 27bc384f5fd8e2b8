"""Thin Prefect tasks around the ``sela`` core: load, one ``sela`` call, save.

Importing this package sets the offline Prefect defaults before Prefect itself is imported.
"""

from tasks.environment import configure_prefect_environment

configure_prefect_environment()
