"""unimoe.train"""
