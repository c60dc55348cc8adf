"""The controller-side channels besides MQTT verdicts that the config enables (OPC UA for PLCs,
Sparkplug B for SCADA), built for the node by the composition root; and the site's shared
gallery, which lives as long as the node as they do."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from prometheus_client.registry import CollectorRegistry

from edge.clock import Clock
from edge.config import Config
from edge.pipeline.node import Node
from edge.pipeline.routing import VerdictChannel
from edge.publish.opcua.contract import VisionState
from edge.site.gallery_share import GallerySharing


def controller_channels(cfg: Config, clock: Clock) -> list[VerdictChannel]:
    """One channel per enabled section of `cfg`, in a fixed order."""
    channels: list[VerdictChannel] = []
    if cfg.opcua.enabled:  # imported only then: asyncua takes a while to import
        from edge.publish.opcua.channel import OpcUaChannel
        channels.append(OpcUaChannel(cfg.opcua, cfg.node, clock))
    if cfg.sparkplug.enabled:  # imported only then: pysparkplug is installed apart
        from edge.publish.sparkplug import SparkplugChannel
        channels.append(SparkplugChannel.from_config(cfg, clock))
    if cfg.site.share_gallery:  # no verdicts: a channel for its start and stop with the node
        channels.append(GallerySharing.from_config(cfg, clock))
    return channels


@runtime_checkable
class WatchesNode(Protocol):
    """A channel that also reports the node's health, cameras and models (Sparkplug B)."""

    def watch(self, health: Callable[[], Mapping[str, object]],
              versions: Callable[[], Mapping[str, str]] | None = None) -> None: ...


def watch_node(node: Node) -> None:
    """Hand the node's health and model versions to the channels that report them (built
    before the node, which they are part of)."""
    for channel in node.channels:
        if isinstance(channel, WatchesNode):
            channel.watch(node.health, node.inspector.model_versions)
        if isinstance(channel, AttachesToNode):
            channel.attach(node.publisher.publish_event, node.metrics.registry,
                           lambda: vision_state(node))
        if isinstance(channel, GallerySharing):  # told of what feedback teaches the gallery
            node.feedback.on_learned = channel.share(
                node.inspector, node.feedback.damage_threshold, node.metrics.registry)


@runtime_checkable
class AttachesToNode(Protocol):
    """A channel that sends `…/events` through the node's publisher, adds its metrics to
    the node's registry and shows the node's state (OPC UA)."""

    def attach(self, publish_event: Callable[[str, Mapping[str, object]], None],
               registry: CollectorRegistry, state: Callable[[], VisionState]) -> None: ...


def vision_state(node: Node) -> VisionState:
    """The node as OPC UA's vision system shows it: an error while a stage is stalled or a
    camera the node needs has failed; starting until every such camera has sent a frame."""
    required = {c.id for c in node.cfg.cameras if c.required}
    cameras = {cid: s for cid, s in node.camera_states().items() if cid in required}
    problems = [f"stage {name} stalled" for name in node.stalled_stages()]
    problems += [f"camera {cid} {s}" for cid, s in cameras.items() if s.startswith("failed")]
    return VisionState(error="; ".join(problems),
                       starting=any(s == "waiting" for s in cameras.values()),
                       model_versions=node.inspector.model_versions(),
                       calibration_ok=dict(node.calibration_ok))
