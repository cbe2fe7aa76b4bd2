"""rollout_server"""
