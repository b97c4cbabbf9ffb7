"""Split-FedLLM: the model cut between client and server (docs/split.md); ``protocol.SplitProtocol``."""
