"""The broker fixture really runs Mosquitto: a QoS 1 message goes round trip."""

from __future__ import annotations

import asyncio

import aiomqtt

from fleet.broker import Mosquitto


async def test_mosquitto_round_trip(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-sub") as sub, \
            aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-pub") as pub:
        await sub.subscribe("twin/test/#", qos=1)
        await pub.publish("twin/test/x", b"hello", qos=1)
        msg = await asyncio.wait_for(anext(aiter(sub.messages)), 5)
        assert msg.topic.value == "twin/test/x"
        assert msg.payload == b"hello"
