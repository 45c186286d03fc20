"""memchat: a chat service whose language model remembers each conversation in its hidden states."""
