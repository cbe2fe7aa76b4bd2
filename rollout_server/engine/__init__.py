"""rollout_server/engine"""
