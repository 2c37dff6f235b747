"""Seeds derived from names, so random draws do not depend on order, threads or sharding."""

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, e.g. ``derive_seed(project_seed, tensor, i)``."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))
