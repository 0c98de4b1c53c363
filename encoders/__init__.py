"""unimoe.encoders"""
