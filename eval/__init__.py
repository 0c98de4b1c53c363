"""unimoe.eval"""
