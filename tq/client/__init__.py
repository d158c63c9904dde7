"""Talking to a broker: ``AsyncClient`` and the blocking ``Client`` over it."""

from tq.client.aio import AsyncClient, TaskInfo, decode_value, encode_payload
from tq.client.sync import Client

__all__ = ["AsyncClient", "Client", "TaskInfo", "decode_value", "encode_payload"]
