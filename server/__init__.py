"""The DeltaStore service: gRPC (``service``), the ops HTTP API (``http``), ``deltastore serve`` (``app``).

Thin adapters over :class:`deltastore.store.Store`: they convert, validate what crosses the
network (limits, chunk framing, each payload's codec header) and map ``deltastore.errors`` to
status codes through one table (``status``). Settings come from flags and ``DELTASTORE_*``
(``settings``); metrics are Prometheus (``metrics``).
"""
