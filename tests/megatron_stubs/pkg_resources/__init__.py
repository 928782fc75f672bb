"""pkg_resources stand-in: megatron.core 0.6.0 only does `from pkg_resources import packaging`, and
setuptools >= 80 no longer ships pkg_resources."""

import packaging  # noqa: F401
import packaging.version  # noqa: F401
