// leo_rt live avatar page: upload a photo, open a session, receive the avatar over WebRTC.
// fps counts frames the browser decoded (RTCPeerConnection.getStats: inbound-rtp framesDecoded);
// latency = the server's render → send delay (p50, from GET /v1/sessions/{id}) + this browser's
// receive → display delay (requestVideoFrameCallback metadata).
"use strict";

const $ = (id) => document.getElementById(id);
const leo = (window.leo = { state: "idle", sessionId: null, framesDecoded: 0, fps: 0, latencyMs: null, error: null });
let pc = null, camera = null, timers = [], token = "";

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) leo.error = text;
}

function headers(extra = {}) {
  token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.error && body.error.reason) || `${r.status} ${r.statusText}`);
  return body;
}

function motion() {
  return document.querySelector("input[name=motion]:checked").value;
}

function iceGathered(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
  });
}

async function start() {
  const file = $("photo").files[0];
  if (!file) return status("Choose a photo first.", true);
  leo.error = null;
  $("start").disabled = true;
  try {
    const form = new FormData();
    form.append("image", file);
    form.append("motion", motion());
    form.append("fps", $("fps").value || "25");
    if (motion() === "lmdm") {
      form.append("sampler", $("sampler").value);
      form.append("steps", $("steps").value || "10");
      if ($("seed").value !== "") form.append("seed", $("seed").value);
    }
    status("Uploading and encoding the photo…");
    const session = await api("/v1/sessions", { method: "POST", body: form });
    leo.sessionId = session.id;
    if (session.seed !== undefined) $("seed").placeholder = `random (${session.seed})`;

    pc = new RTCPeerConnection();
    if (motion() === "drive") {
      status("Opening the webcam…");
      camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
      $("camera").srcObject = camera;
      $("camera").hidden = false;
      for (const t of camera.getVideoTracks()) pc.addTrack(t, camera); // sendrecv: camera out, avatar in
    } else {
      pc.addTransceiver("video", { direction: "recvonly" });
    }
    pc.ontrack = (e) => { $("avatar").srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      leo.state = pc.connectionState;
      if (pc.connectionState === "failed") status("The connection failed.", true);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    status("Connecting…");
    const answer = await api(`/v1/sessions/${session.id}/webrtc`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    await pc.setRemoteDescription(answer);
    status(`Session ${session.id}: ${session.motion}, ${session.size}×${session.size} at ${session.fps} fps.`);
    $("pause").disabled = $("stop").disabled = false;
    watch();
  } catch (e) {
    const reason = `Could not start: ${e.message}`;
    await stop(true); // frees the session if it was created
    status(reason, true);
  }
}

function watch() {
  // decoded frames and fps from WebRTC statistics, twice a second
  const samples = [];
  timers.push(setInterval(async () => {
    if (!pc) return;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        leo.framesDecoded = s.framesDecoded || 0;
        samples.push([performance.now(), leo.framesDecoded]);
      }
    });
    while (samples.length > 5) samples.shift();
    if (samples.length > 1) {
      const [t0, n0] = samples[0], [t1, n1] = samples[samples.length - 1];
      leo.fps = t1 > t0 ? (1000 * (n1 - n0)) / (t1 - t0) : 0;
    }
    $("fps-value").textContent = leo.fps.toFixed(1);
    $("frames").textContent = leo.framesDecoded;
  }, 500));

  // browser side of the latency: receive → display, per presented frame
  const video = $("avatar");
  let display = null;
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const onFrame = (now, meta) => {
      if (meta.receiveTime !== undefined) display = meta.expectedDisplayTime - meta.receiveTime;
      if (pc) video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  // server side of the latency: render → send (p50), once a second
  timers.push(setInterval(async () => {
    if (!leo.sessionId) return;
    try {
      const info = await api(`/v1/sessions/${leo.sessionId}`);
      const server = info.delay_ms.p50;
      if (server === null) return;
      leo.latencyMs = server + (display || 0);
      $("latency").textContent = leo.latencyMs.toFixed(0);
      $("latency-detail").textContent = `(server ${server.toFixed(0)}` + (display !== null ? ` + browser ${display.toFixed(0)})` : ")");
    } catch (e) {
      status(`Session ended: ${e.message}`, true);
      stop(false);
    }
  }, 1000));
}

async function pause() {
  if (!leo.sessionId) return;
  const paused = $("pause").textContent === "Pause";
  await api(`/v1/sessions/${leo.sessionId}/control`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ type: paused ? "pause" : "resume" }),
  }).catch((e) => status(e.message, true));
  $("pause").textContent = paused ? "Resume" : "Pause";
}

async function stop(remove = true) {
  timers.forEach(clearInterval);
  timers = [];
  const id = leo.sessionId;
  leo.sessionId = null;
  if (remove && id) await api(`/v1/sessions/${id}`, { method: "DELETE" }).catch(() => {});
  if (pc) pc.close();
  pc = null;
  if (camera) camera.getTracks().forEach((t) => t.stop());
  camera = null;
  $("camera").hidden = true;
  $("start").disabled = false;
  $("pause").disabled = $("stop").disabled = true;
  $("pause").textContent = "Pause";
  leo.state = "idle";
}

window.addEventListener("pagehide", () => {
  if (leo.sessionId) fetch(`/v1/sessions/${leo.sessionId}`, { method: "DELETE", headers: headers(), keepalive: true });
});

document.querySelectorAll("input[name=motion]").forEach((r) =>
  r.addEventListener("change", () => { $("lmdm-options").hidden = motion() !== "lmdm"; }));
$("start").addEventListener("click", start);
$("pause").addEventListener("click", pause);
$("stop").addEventListener("click", () => { stop(true); status("Stopped."); });

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("auth").hidden = !h.auth;
  if (h.weights === "random") $("notice").textContent =
    "This server runs an animator with random weights (no checkpoint): the avatar will not look like the photo.";
});
