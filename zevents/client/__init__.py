"""Network clients of a zevents broker: producers, subscribers, admin; sync and asyncio."""

from .admin import Admin, AsyncAdmin
from .producer import AsyncProducer, Producer, StreamClosed
from .subscriber import AsyncSubscriber, AsyncSubscription, Subscriber, Subscription

__all__ = [
    "Admin",
    "AsyncAdmin",
    "AsyncProducer",
    "AsyncSubscriber",
    "AsyncSubscription",
    "Producer",
    "StreamClosed",
    "Subscriber",
    "Subscription",
]
