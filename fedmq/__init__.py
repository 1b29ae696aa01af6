"""FedMQ's front door: the `fedmq` command and the in-process compositions."""
