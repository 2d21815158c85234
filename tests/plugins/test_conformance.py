"""Every built-in technique passes the same conformance kit third-party plugins use."""

import pytest

from slimforge.core.manager import Plugins
from slimforge.core.testing import TechniqueConformance

BUILTIN = Plugins(load_entry_points=False).registry.names()


@pytest.fixture(params=BUILTIN)
def technique_name(request):
    return request.param


class TestBuiltinConformance(TechniqueConformance):
    @pytest.fixture(autouse=True)
    def _select(self, technique_name):
        self.technique = technique_name
