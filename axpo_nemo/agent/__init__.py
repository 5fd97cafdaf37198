"""The agent side of AXPO: chat/tool protocol, tools, sandbox and answer verification."""
