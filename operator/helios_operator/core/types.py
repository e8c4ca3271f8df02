"""Typed values the operator reasons about: spec, status, profiles, observed objects, actions.

Everything here is plain data. The CR's camelCase dicts are parsed into these once, at the edge
(`HeliosSpec.from_dict`, `Status.from_dict`), and written back with `to_dict`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from helios_operator.core import names

Objective = Literal["throughput", "latency", "energy"]
Mode = Literal["active", "advisory"]
Phase = Literal["Pending", "Profiling", "Serving", "Reassessing", "Switching", "Failed"]
Role = Literal["profile", "serve"]

OBJECTIVES: tuple[Objective, ...] = ("throughput", "latency", "energy")
MODES: tuple[Mode, ...] = ("active", "advisory")
MAX_CANDIDATES = 8
GPU_RESOURCE = "nvidia.com/gpu"
WORKER_DTYPES = ("auto", "bfloat16", "float16", "float32")  # the extended resource the NVIDIA device plugin advertises
MAX_DECISIONS = 20  # status.decisions is bounded; older entries fall off


class SpecError(ValueError):
    """A spec that passed the API server's schema but cannot work (reported as a condition)."""


# ---------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class Candidate:
    name: str
    model: str  # local path, pvc://claim/path or hf://org/name
    layers: int | None = None  # None: read from the model's config (via the worker's telemetry)


@dataclass(frozen=True)
class ExitSpec:
    confidence_threshold: float = 0.9
    breach_window: int = 100  # tokens (paper: 100)
    breach_limit: int = 50  # breaches in the window that trigger adaptation (paper: 50)


@dataclass(frozen=True)
class ProfilingSpec:
    requests_per_candidate: int = 5
    timeout_seconds: int = 900  # per candidate, from when its pod was scheduled: then profile what it heard, or drop it
    max_concurrent_workers: int | None = None  # profile workers up at once; None: as many as the GPU supply allows
    idle_seconds: int = 300  # no request this long: profile workers but one go to zero replicas; 0: never


@dataclass(frozen=True)
class ReassessmentSpec:
    every_requests: int = 150  # paper: 150


@dataclass(frozen=True)
class RolloutSpec:
    ready_timeout_seconds: int = 600  # a new worker not Ready this long after it was scheduled is rolled back
    schedule_timeout_seconds: int = 1800  # how long a pod may wait for a node (a cluster autoscaler adding one)


@dataclass(frozen=True)
class SecretKey:
    """One key of a Secret in the HeliosDeployment's namespace."""

    name: str
    key: str


# A positive quantity (no sign, no fraction): the CRD's rule on worker.modelCache.sizeLimit uses it too.
SIZE_LIMIT_PATTERN = "^[1-9][0-9]*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


@dataclass(frozen=True)
class ModelCacheSpec:
    """Where hf:// models are downloaded: a claim shared by every pod of the HeliosDeployment
    (downloaded once, reused by new replicas, switches and profiling rounds), else a per-pod
    emptyDir bounded by size_limit (the kubelet evicts a pod that writes more)."""

    claim_name: str | None = None
    size_limit: str = "50Gi"


@dataclass(frozen=True)
class WorkerSpec:
    image: str | None = None  # None: the operator-wide settings.worker_image
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    env: tuple[dict[str, Any], ...] = ()
    max_batch: int = 64
    api_token_secret: SecretKey | None = None  # the bearer token the worker's /v1 routes require
    dtype: str = "auto"  # auto: bfloat16 on the GPU the pod gets, float32 on a CPU-only node
    model_cache: ModelCacheSpec = ModelCacheSpec()

    @property
    def pod_resources(self) -> dict[str, Any]:
        """What each worker container asks for: the spec's, or one GPU."""
        return self.resources or {"limits": {GPU_RESOURCE: 1}}

    @property
    def gpus_per_pod(self) -> int:
        """The `nvidia.com/gpu` each worker pod asks for (limits win, as Kubernetes requires them equal)."""
        for kind in ("limits", "requests"):
            value = (self.pod_resources.get(kind) or {}).get(GPU_RESOURCE)
            if value is not None:
                return int(value)
        return 0


@dataclass(frozen=True)
class InferencePoolSpec:
    """An InferencePool (Gateway API Inference Extension, v1) over the active worker's pods, routed by
    the named endpoint picker Service: for clusters whose gateway schedules requests through one."""

    endpoint_picker: str  # the endpoint picker's Service, in the HeliosDeployment's namespace
    port: int  # its gRPC port
    failure_mode: str = "FailClose"  # FailOpen: the gateway picks a pod itself when the picker is down


FAILURE_MODES = ("FailOpen", "FailClose")


@dataclass(frozen=True)
class HeliosSpec:
    candidates: tuple[Candidate, ...]
    objective: Objective = "throughput"
    accuracy_floor: float = 0.98
    mode: Mode = "active"
    replicas: int = 1
    exit: ExitSpec = ExitSpec()
    profiling: ProfilingSpec = ProfilingSpec()
    reassessment: ReassessmentSpec = ReassessmentSpec()
    rollout: RolloutSpec = RolloutSpec()
    worker: WorkerSpec = WorkerSpec()
    prometheus_url: str | None = None
    inference_pool: InferencePoolSpec | None = None

    def candidate(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> HeliosSpec:
        """Parse a CR's spec, applying the same defaults as the CRD; SpecError says what is wrong."""
        try:
            return _parse_spec(spec)
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise SpecError(f"spec is malformed: {err}") from err


def _parse_spec(spec: dict[str, Any]) -> HeliosSpec:
    raw = spec.get("candidates") or []
    if not raw:
        raise SpecError("spec.candidates must name at least one model")
    if len(raw) > MAX_CANDIDATES:
        raise SpecError(f"spec.candidates holds {len(raw)} entries; at most {MAX_CANDIDATES} are allowed")
    candidates = tuple(
        Candidate(name=str(c["name"]), model=str(c["model"]), layers=_opt_int(c.get("layers"))) for c in raw
    )
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise SpecError(f"candidate names must be unique, got {names}")
    objective = spec.get("objective", "throughput")
    if objective not in OBJECTIVES:
        raise SpecError(f"spec.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    mode = spec.get("mode", "active")
    if mode not in MODES:
        raise SpecError(f"spec.mode must be one of {', '.join(MODES)}, got {mode!r}")
    floor = float(spec.get("accuracyFloor", HeliosSpec.accuracy_floor))
    if not 0 < floor <= 1:
        raise SpecError(f"spec.accuracyFloor must be in (0, 1], got {floor}")
    ex = spec.get("exit") or {}
    exit_spec = ExitSpec(
        confidence_threshold=float(ex.get("confidenceThreshold", ExitSpec.confidence_threshold)),
        breach_window=int(ex.get("breachWindow", ExitSpec.breach_window)),
        breach_limit=int(ex.get("breachLimit", ExitSpec.breach_limit)),
    )
    if not 0 < exit_spec.confidence_threshold < 1:
        raise SpecError("spec.exit.confidenceThreshold must be in (0, 1)")
    if not 1 <= exit_spec.breach_limit < exit_spec.breach_window:
        raise SpecError("spec.exit.breachLimit must be at least 1 and below spec.exit.breachWindow")
    prof = spec.get("profiling") or {}
    profiling = ProfilingSpec(
        requests_per_candidate=int(prof.get("requestsPerCandidate", ProfilingSpec.requests_per_candidate)),
        timeout_seconds=int(prof.get("timeoutSeconds", ProfilingSpec.timeout_seconds)),
        max_concurrent_workers=_opt_int(prof.get("maxConcurrentWorkers")),
        idle_seconds=int(prof.get("idleSeconds", ProfilingSpec.idle_seconds)),
    )
    if profiling.idle_seconds < 0:
        raise SpecError("spec.profiling.idleSeconds must not be negative (0: never scale down)")
    if profiling.max_concurrent_workers is not None and profiling.max_concurrent_workers < 1:
        raise SpecError("spec.profiling.maxConcurrentWorkers must be at least 1")
    rea = spec.get("reassessment") or {}
    reassessment = ReassessmentSpec(every_requests=int(rea.get("everyRequests", ReassessmentSpec.every_requests)))
    roll = spec.get("rollout") or {}
    rollout = RolloutSpec(
        ready_timeout_seconds=int(roll.get("readyTimeoutSeconds", RolloutSpec.ready_timeout_seconds)),
        schedule_timeout_seconds=int(roll.get("scheduleTimeoutSeconds", RolloutSpec.schedule_timeout_seconds)),
    )
    wk = spec.get("worker") or {}
    token = wk.get("apiTokenSecret")
    worker = WorkerSpec(
        image=str(wk["image"]) if wk.get("image") else None,
        resources=dict(wk.get("resources") or {}),
        node_selector={str(k): str(v) for k, v in (wk.get("nodeSelector") or {}).items()},
        tolerations=tuple(wk.get("tolerations") or ()),
        env=tuple(wk.get("env") or ()),
        max_batch=int(wk.get("maxBatch", WorkerSpec.max_batch)),
        api_token_secret=SecretKey(str(token["name"]), str(token["key"])) if token else None,
        dtype=str(wk.get("dtype", WorkerSpec.dtype)),
        model_cache=_model_cache(wk.get("modelCache") or {}),
    )
    if worker.dtype not in WORKER_DTYPES:
        raise SpecError(f"spec.worker.dtype must be one of {', '.join(WORKER_DTYPES)}, got {worker.dtype!r}")
    replicas = int(spec.get("replicas", 1))
    if replicas < 0:
        raise SpecError("spec.replicas must not be negative")
    prom = (spec.get("prometheus") or {}).get("url")
    return HeliosSpec(
        inference_pool=_inference_pool(spec.get("inferencePool")),
        candidates=candidates,
        objective=objective,
        accuracy_floor=floor,
        mode=mode,
        replicas=replicas,
        exit=exit_spec,
        profiling=profiling,
        reassessment=reassessment,
        rollout=rollout,
        worker=worker,
        prometheus_url=str(prom) if prom else None,
    )


def _inference_pool(raw: Any) -> InferencePoolSpec | None:
    if not raw:
        return None
    picker = raw.get("endpointPicker") or {}
    pool = InferencePoolSpec(
        endpoint_picker=str(picker.get("name") or ""),
        port=int(picker.get("port") or 0),
        failure_mode=str(picker.get("failureMode") or InferencePoolSpec.failure_mode),
    )
    if not pool.endpoint_picker or not 1 <= pool.port <= 65535:
        raise SpecError("spec.inferencePool.endpointPicker needs a name and a port in 1..65535")
    if pool.failure_mode not in FAILURE_MODES:
        raise SpecError(f"spec.inferencePool.endpointPicker.failureMode must be one of {', '.join(FAILURE_MODES)}")
    return pool


def _model_cache(raw: dict[str, Any]) -> ModelCacheSpec:
    if raw.get("claimName") and raw.get("sizeLimit"):
        raise SpecError("spec.worker.modelCache: set claimName or sizeLimit, not both (a claim has its own size)")
    cache = ModelCacheSpec(
        claim_name=str(raw["claimName"]) if raw.get("claimName") else None,
        size_limit=str(raw.get("sizeLimit") or ModelCacheSpec.size_limit),
    )
    if not re.fullmatch(SIZE_LIMIT_PATTERN, cache.size_limit):
        raise SpecError(
            f"spec.worker.modelCache.sizeLimit must be a positive quantity such as 50Gi, got {cache.size_limit!r}"
        )
    return cache


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------
# What telemetry says


@dataclass(frozen=True)
class CandidateProfile:
    """What profiling at full depth measured for one candidate: the policy's input."""

    candidate: str
    model_layers: int  # N
    profiled_tokens: int
    profiled_requests: int
    agreement: tuple[float, ...]  # agreement[l-1]: share of tokens whose exit at layer l equals layer N's
    depth_agreement: tuple[float, ...]  # [l-1]: share that early-exit decoding truncated at l gets right
    first_confident: tuple[float, ...]  # share of tokens first confident at layer l (index l-1), l=1..N+1
    tokens_per_second: float  # decode throughput at full depth, per replica
    fixed_weight_bytes: float  # embeddings, final norm, LM head
    layer_weight_bytes: float  # one decoder layer
    kv_bytes_per_token_per_layer: float
    joules_per_token: float | None = None  # None where NVML reports no energy
    exits: str = ""  # helios_worker_info's exits: trained | adapters | off | untrained; "" when not reported

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "modelLayers": self.model_layers,
            "profiledTokens": self.profiled_tokens,
            "profiledRequests": self.profiled_requests,
            "agreement": [round(a, 4) for a in self.agreement],
            "depthAgreement": [round(a, 4) for a in self.depth_agreement],
            "firstConfident": [round(f, 4) for f in self.first_confident],
            "tokensPerSecond": round(self.tokens_per_second, 3),
            "fixedWeightBytes": self.fixed_weight_bytes,
            "layerWeightBytes": self.layer_weight_bytes,
            "kvBytesPerTokenPerLayer": self.kv_bytes_per_token_per_layer,
            "joulesPerToken": self.joules_per_token,
            "exits": self.exits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateProfile:
        jpt = d.get("joulesPerToken")
        return cls(
            candidate=str(d["candidate"]),
            model_layers=int(d["modelLayers"]),
            profiled_tokens=int(d["profiledTokens"]),
            profiled_requests=int(d["profiledRequests"]),
            agreement=tuple(float(a) for a in d["agreement"]),
            depth_agreement=tuple(float(a) for a in d.get("depthAgreement") or d["agreement"]),
            first_confident=tuple(float(f) for f in d["firstConfident"]),
            tokens_per_second=float(d["tokensPerSecond"]),
            fixed_weight_bytes=float(d["fixedWeightBytes"]),
            layer_weight_bytes=float(d["layerWeightBytes"]),
            kv_bytes_per_token_per_layer=float(d["kvBytesPerTokenPerLayer"]),
            joules_per_token=None if jpt is None else float(jpt),
            exits=str(d.get("exits") or ""),
        )


@dataclass(frozen=True)
class WorkerTelemetry:
    """One worker Deployment's series, summed over its pods."""

    worker: str  # the worker Deployment's name
    candidate: str
    depth: int
    model_layers: int
    requests_ok: float  # helios_requests_total{status="ok"}
    generated_tokens: float
    breach_ratio: float  # helios_breach_window_ratio (max over pods)
    window_tokens: float  # tokens in the breach window (min over pods)
    profile: CandidateProfile | None = None  # set for workers in --profile mode


TelemetryReason = Literal["Ok", "Missing", "Stale", "PrometheusError"]


@dataclass(frozen=True)
class TelemetrySnapshot:
    """What the operator knows from Prometheus now. Unavailable telemetry never triggers a roll."""

    reason: TelemetryReason
    message: str = ""
    workers: tuple[WorkerTelemetry, ...] = ()

    @property
    def available(self) -> bool:
        return self.reason == "Ok"

    def worker(self, name: str) -> WorkerTelemetry | None:
        return next((w for w in self.workers if w.worker == name), None)


# ---------------------------------------------------------------------------------------------
# What the cluster (or the local platform) holds


@dataclass(frozen=True)
class Owner:
    """The HeliosDeployment that owns the children (their ownerReference and the Events' subject)."""

    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class ObservedWorker:
    """A worker Deployment owned by the HeliosDeployment, as last observed."""

    name: str
    candidate: str
    depth: int
    role: Role
    pool: str
    replicas: int  # desired
    ready_replicas: int
    created_at: float  # epoch seconds
    failure: str | None = None  # a pod's container crashing or stuck, with the worker's own error line
    failure_reason: str = "WorkerFailed"  # Degraded's reason for `failure`: QuotaExceeded, VolumeMultiAttach...
    unschedulable: str | None = None  # the scheduler's word while a pod waits for a node; None: placed or unknown
    scheduled_at: float | None = None  # epoch seconds its pods were all placed; None: not yet, or not reported
    template: str | None = None  # EnsureWorker.template it runs; None: not recorded (left as it is)

    @property
    def started_at(self) -> float:
        """Where the clock of image pull and model load starts: placement, not creation, so time spent
        waiting for a node (which has its own timeout) never counts against loading."""
        return self.scheduled_at if self.scheduled_at is not None else self.created_at


@dataclass(frozen=True)
class Observed:
    workers: tuple[ObservedWorker, ...] = ()
    service_pool: str | None = None  # the pool the stable Service selects; None: no Service yet
    gpu_supply: int | None = None  # nvidia.com/gpu allocatable on schedulable nodes; None: unknown or not readable

    def worker(self, name: str) -> ObservedWorker | None:
        return next((w for w in self.workers if w.name == name), None)


# ---------------------------------------------------------------------------------------------
# Actions: what the step asks a platform to do. Each is idempotent.


@dataclass(frozen=True)
class EnsureWorker:
    """Create the worker Deployment if absent; otherwise make its replicas match."""

    name: str
    candidate: str
    model: str
    depth: int
    role: Role
    pool: str
    replicas: int
    template: str = ""  # a fingerprint of everything else the pods are made of: a change rolls them


@dataclass(frozen=True)
class DeleteWorker:
    """Drain and delete a worker Deployment (its pods finish in-flight requests first)."""

    name: str


@dataclass(frozen=True)
class PointService:
    """Make the stable Service select this pool (creating the Service if absent)."""

    pool: str


@dataclass(frozen=True)
class EmitEvent:
    reason: str
    message: str
    type: Literal["Normal", "Warning"] = "Normal"


Action = EnsureWorker | DeleteWorker | PointService | EmitEvent


@dataclass(frozen=True)
class EnsureMonitoring:
    """The controller's own action after each step's changes: the objects Prometheus scrapes the
    workers through (a platform that has none, like the local one, does nothing)."""


@dataclass(frozen=True)
class EnsureDisruptionBudget:
    """The controller's own action after each step's changes: a PodDisruptionBudget over the serving
    pods, so a drain evicts them one at a time (a platform without evictions does nothing)."""


@dataclass(frozen=True)
class EnsureInferencePool:
    """The controller's own action where spec.inferencePool is set: the InferencePool selects the pool
    the stable Service selects (a platform without a gateway does nothing)."""

    pool: str


PlatformAction = Action | EnsureMonitoring | EnsureDisruptionBudget | EnsureInferencePool


# ---------------------------------------------------------------------------------------------
# Status


@dataclass(frozen=True)
class Condition:
    type: str  # Ready | Profiling | MetricsAvailable | RolloutProgressing | Degraded
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    last_transition_time: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Condition:
        return cls(d["type"], d["status"], d.get("reason", ""), d.get("message", ""), d.get("lastTransitionTime", ""))


@dataclass(frozen=True)
class Placement:
    """A (candidate, depth) served by one worker Deployment."""

    candidate: str
    depth: int
    worker: str
    since: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "depth": self.depth, "worker": self.worker, "since": self.since}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(str(d["candidate"]), int(d["depth"]), str(d["worker"]), str(d.get("since", "")))


@dataclass(frozen=True)
class Decision:
    """One choice of the policy, kept in a bounded history with its reason."""

    time: str
    trigger: Literal["profiling", "breach", "reassessment", "rollback", "spec"]
    candidate: str
    depth: int
    reason: str
    applied: bool  # False in advisory mode

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "trigger": self.trigger,
            "candidate": self.candidate,
            "depth": self.depth,
            "reason": self.reason,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(d["time"], d["trigger"], d["candidate"], int(d["depth"]), d["reason"], bool(d["applied"]))


@dataclass(frozen=True)
class Status:
    phase: Phase = "Pending"
    active: Placement | None = None  # what the Service serves
    target: Placement | None = None  # a switch in progress (Switching)
    profiles: tuple[CandidateProfile, ...] = ()
    decisions: tuple[Decision, ...] = ()
    conditions: tuple[Condition, ...] = ()
    replicas: int = 0
    ready_replicas: int = 0
    selector: str = ""
    observed_generation: int = 0
    profiling_round: int = 0  # bumps at each (re)profiling; names the profile workers
    profiling_since: str = ""
    requests_at_assessment: float = 0.0  # requests served by the active worker when last assessed
    switch_started: str = ""
    round_profiles: tuple[CandidateProfile, ...] = ()  # this round's finished candidates (their workers released)
    round_dropped: tuple[str, ...] = ()  # this round's candidates given up on (no request, or no node)
    round_heard: float = 0.0  # requests the round's pool had served when last counted
    round_heard_at: str = ""  # when that count last grew: the idle clock

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def with_changes(self, **changes: Any) -> Status:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "active": self.active.to_dict() if self.active else None,
            "target": self.target.to_dict() if self.target else None,
            "profiles": [p.to_dict() for p in self.profiles],
            "decisions": [d.to_dict() for d in self.decisions],
            "conditions": [c.to_dict() for c in self.conditions],
            "replicas": self.replicas,
            "readyReplicas": self.ready_replicas,
            "selector": self.selector,
            "observedGeneration": self.observed_generation,
            "profilingRound": self.profiling_round,
            "profilingSince": self.profiling_since,
            "requestsAtAssessment": self.requests_at_assessment,
            "switchStarted": self.switch_started,
            "roundProfiles": [p.to_dict() for p in self.round_profiles],
            "roundDropped": list(self.round_dropped),
            "roundHeard": self.round_heard,
            "roundHeardAt": self.round_heard_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Status:
        """Read status back (an operator restart resumes from it); unknown or absent keys default."""
        if not d:
            return cls()
        return cls(
            phase=d.get("phase") or "Pending",
            active=Placement.from_dict(d["active"]) if d.get("active") else None,
            target=Placement.from_dict(d["target"]) if d.get("target") else None,
            profiles=tuple(CandidateProfile.from_dict(p) for p in d.get("profiles") or ()),
            decisions=tuple(Decision.from_dict(x) for x in d.get("decisions") or ()),
            conditions=tuple(Condition.from_dict(c) for c in d.get("conditions") or ()),
            replicas=int(d.get("replicas") or 0),
            ready_replicas=int(d.get("readyReplicas") or 0),
            selector=str(d.get("selector") or ""),
            observed_generation=int(d.get("observedGeneration") or 0),
            profiling_round=int(d.get("profilingRound") or 0),
            profiling_since=str(d.get("profilingSince") or ""),
            requests_at_assessment=float(d.get("requestsAtAssessment") or 0.0),
            switch_started=str(d.get("switchStarted") or ""),
            round_profiles=tuple(CandidateProfile.from_dict(p) for p in d.get("roundProfiles") or ()),
            round_dropped=tuple(str(n) for n in d.get("roundDropped") or ()),
            round_heard=float(d.get("roundHeard") or 0.0),
            round_heard_at=str(d.get("roundHeardAt") or ""),
        )


@dataclass(frozen=True)
class StepInput:
    """Everything the pure step reads."""

    name: str  # the HeliosDeployment's name
    generation: int
    spec: HeliosSpec
    status: Status
    observed: Observed
    telemetry: TelemetrySnapshot
    now: float  # epoch seconds


@dataclass(frozen=True)
class StepResult:
    actions: tuple[Action, ...]
    status: Status
    requeue_after: float | None = None  # seconds until the step wants to run again
