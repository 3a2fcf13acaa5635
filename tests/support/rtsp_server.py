#!/usr/bin/python3
"""A live H.264 RTSP stream on loopback, for tests: GStreamer's own RTSP server (Debian's
gir1.2-gst-rtsp-server-1.0 and python3-gi).

    rtsp_server.py PORT [PATH]     serves rtsp://127.0.0.1:PORT/PATH (default /test)

Prints `ready` on stdout once it listens, then serves until killed. Optional credentials:
RTSP_USER and RTSP_PASS in the environment turn on basic authentication.
"""
import os
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port = sys.argv[1]
path = sys.argv[2] if len(sys.argv) > 2 else "/test"
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
factory.set_shared(True)
user, password = os.environ.get("RTSP_USER"), os.environ.get("RTSP_PASS")
if user and password:
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_permission_for_role("user", "media.factory.access", True)
    permissions.add_permission_for_role("user", "media.factory.construct", True)
    factory.set_permissions(permissions)
server.get_mount_points().add_factory(path, factory)
if server.attach(None) == 0:
    sys.exit("rtsp_server: cannot listen on port " + port)
print("ready", flush=True)
GLib.MainLoop().run()
