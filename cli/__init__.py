"""The deferredseg command line, the one place that composes the client and server sides."""
