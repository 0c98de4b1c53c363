"""unimoe.demo"""
