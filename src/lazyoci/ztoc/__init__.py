"""ztoc"""
