"""unimoe.connectors"""
