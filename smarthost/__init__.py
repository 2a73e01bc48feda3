"""The QMQP smart host: the durable queue, the scheduler, local delivery and the servers."""
