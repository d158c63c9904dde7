"""Talking to a broker: ``AsyncClient`` and the blocking ``Client`` over it."""

from tq.client.aio import AsyncClient, TaskInfo
from tq.client.sync import Client
from tq.client.values import decode_value, encode_payload

__all__ = ["AsyncClient", "Client", "TaskInfo", "decode_value", "encode_payload"]
