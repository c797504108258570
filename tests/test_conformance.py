"""Every backend runs the one conformance suite (the ``lh_backend`` fixture in conftest)."""

from leasehold.testing.conformance import *  # noqa: F403
