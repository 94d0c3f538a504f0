"""DeltaStore: KV-cache storage for LLM inference.

Folders map into this one import namespace (see README, "Layout"):
``codecs/`` -> ``deltastore.codecs``, ``server/`` -> ``deltastore.server``,
``client/`` -> ``deltastore.client``, generated protobuf code -> ``deltastore.v1``.
The core store (this package) never imports grpc, fastapi or torch.
"""

__version__ = "0.1.0"
