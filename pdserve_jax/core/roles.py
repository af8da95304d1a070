"""Elastic roles: disaggregated instances that move between prefill and decode.

`ElasticCoordinator` runs a `Disaggregated` deployment with `elastic` set. Each device
group (a replica: one mesh, or a pipeline's stages) has two schedulers over its one
pool, a prefill twin and a decode twin, one `Instance` each (per pipeline virtual
engine), and serves one role at a time; the twins never run a step at once. The
executor sees both twins from the start, so the engine compiles both programs on
every group and the simulator keeps one device clock per group.

A move of group G to the other role, decided by the `core.elastic.RoleController`
from the SLO attainment of each phase (or asked for with `move`):

  prefill -> decode: G takes no more prompts; those queued there (holding no pages)
    join the other prefill instances' queues; once its step in flight ends, its
    decode twin serves, taking G's finished prompts in place (their KV is already in
    G's pool: no copy). Hand-offs being copied out of G land as usual.
  decode -> prefill: G takes no more hand-offs; between its steps, each request it
    holds migrates (a KV copy of all it has cached, as a hand-off) to the least
    loaded other decode instance with pages for it, oldest first; one that finds no
    room decodes on there until one has (Llumnix-style live migration, minus the
    overlap with decoding). Once G holds nothing, its prefill twin joins the prefill
    instances.

Prefix caching: a migration, like a hand-off, copies only the pages the destination's
cache lacks (`copy_skip`). With conditional disaggregation every decode twin prefills
locally as the decode instances born so do; a decode group moving to prefill first
prefills the prompts queued on it locally (no new ones come), then migrates them with
the rest. A group keeps one pool, and its prefix cache, in either role, so a cache on
prefill pools only (`decode_cache=False`) is refused for elastic deployments.

Pools and weights stay; only which scheduler feeds the group changes. The group to
move is the least loaded of its role (the quickest drain); a lost group never moves.
The last instance of a role (the controller's minimum) never leaves it. Limits: one
move at a time; a migration stops the request for its copy (no overlap with its
decoding); a draining decode group whose requests find no room elsewhere decodes
them to the end.
"""

from __future__ import annotations

from typing import Optional

from pdserve_jax.core import deploy
from pdserve_jax.core.coordinator import DisaggregatedCoordinator, Instance
from pdserve_jax.core.elastic import RoleController
from pdserve_jax.core.policies import DecodeScheduler, PrefillScheduler, least_loaded
from pdserve_jax.core.step import DECODE, PREFILL


class _Group:
  """One device group's twins (one per pipeline virtual engine, in order), the role
  it serves and, while it drains, the role it is moving to."""

  def __init__(self, name: str, prefill: list[Instance], decode: list[Instance],
               role: str):
    self.name, self.role = name, role
    self.twins = {PREFILL: prefill, DECODE: decode}
    self.target: Optional[str] = None

  @property
  def lost(self) -> bool:
    return any(i.lost for i in self.twins[PREFILL] + self.twins[DECODE])

  @property
  def num_waiting(self) -> int:
    return sum(i.num_waiting for i in self.twins[self.role])

  @property
  def num_running(self) -> int:
    return sum(i.num_running for i in self.twins[self.role])


class ElasticCoordinator(DisaggregatedCoordinator):
  """A disaggregated deployment whose instances change role (module docstring)."""

  def __init__(self, dep: deploy.Disaggregated, ex, ttft_slo: Optional[float] = None,
               tpot_slo: Optional[float] = None, start_time: float = 0.0, on_end=None):
    if ttft_slo is None or tpot_slo is None:
      raise ValueError("elastic roles are driven by the SLOs: give ttft_slo and tpot_slo")
    assert dep.elastic is not None
    super().__init__(dep, ex, on_end)
    p, d = dep.instance_specs()
    births: dict[str, list[Instance]] = {}
    for inst in self.instances:
      births.setdefault(inst.group, []).append(inst)
    self.groups: list[_Group] = []
    self._twin: dict[Instance, Instance] = {}
    for name, born in births.items():
      role = born[0].phase
      twins = []
      for i in born:  # after every birth instance, so the executor pairs them in order
        alloc = i.sched.allocator
        # A decode twin prefills locally as the decode instances born so do
        # (conditional disaggregation), so arrivals may go to a group moved to decode.
        sched = (DecodeScheduler(alloc, d.max_batch, d.page_policy, d.max_decode_tokens,
                                 self.threshold > 0, d.max_step_tokens) if role == PREFILL else
                 PrefillScheduler(alloc, p.max_batch, p.max_step_tokens, p.page_policy))
        twin = Instance(f"{i.name}:{DECODE if role == PREFILL else PREFILL}", name, sched,
                        i.spec, DECODE if role == PREFILL else PREFILL)
        self._twin[i], self._twin[twin] = twin, i
        twins.append(twin)
      self.instances += twins
      self.groups.append(_Group(name, born if role == PREFILL else twins,
                                twins if role == PREFILL else born, role))
    self._group = {i: g for g in self.groups for ph in (PREFILL, DECODE) for i in g.twins[ph]}
    self._entry = [g.twins[g.role][0] for g in self.groups]
    self.controller = RoleController(ttft_slo, tpot_slo, dep.elastic, dep.num_prefill,
                                     dep.num_decode, start_time)

  # -- what the executor and the base class ask ---------------------------------

  def copy_pairs(self):
    names = [g.name for g in self.groups]
    return [(a, b) for a in names for b in names if a != b]

  def _entry_instances(self):
    return self._entry  # any group may serve either phase: its pool must hold each request

  def _sources(self):
    return self._alive([i for g in self.groups for i in g.twins[PREFILL]])

  def _home(self, src):
    g = self._group[src]
    if g.role == DECODE and g.target is None and not g.lost:
      return self._twin[src]
    return None

  def share_history(self):
    """{"elastic": [(time, share of instances serving prefill)]} at the start and at
    every completed move."""
    return {"elastic": [(t, n / (n + m)) for t, n, m in self.controller.history]}

  @property
  def role_history(self) -> list[tuple[float, int, int]]:
    """(time, prefill instances, decode instances) at the start and every move."""
    return list(self.controller.history)

  def role_stats(self):
    """The instances serving each phase as of the last completed move, and the moves."""
    history = self.role_history
    return {"elastic_prefill": history[-1][1], "elastic_decode": history[-1][2],
            "elastic_moves": len(history) - 1}

  # -- entry points ---------------------------------------------------------------

  def step_done(self, inst, now, seconds):
    step = inst.step
    super().step_done(inst, now, seconds)
    if step is not None:
      self._observe(step, now)
    self._settle(now)

  def repeats(self, inst):
    return False  # every step end is observed and may settle a move

  def copy_done(self, req, now, failed=False):
    super().copy_done(req, now, failed)
    self._settle(now)

  def abort(self, req, now, reason="aborted"):
    super().abort(req, now, reason)
    self._settle(now)

  def lose(self, inst, now):
    super().lose(inst, now)
    self._settle(now)

  def move(self, to: str, now: float) -> Optional[str]:
    """Starts moving the least loaded group serving the other phase to `to` (PREFILL
    or DECODE); returns its name, or None when no group may move now (one is
    draining, or the other phase is at its minimum)."""
    if to not in (PREFILL, DECODE):
      raise ValueError(f"role must be {PREFILL!r} or {DECODE!r}, got {to!r}")
    if any(g.target is not None for g in self.groups):
      return None
    serving = lambda role: [g for g in self.groups if g.role == role and not g.lost]
    frm = DECODE if to == PREFILL else PREFILL
    cfg = self.controller.config
    if len(serving(frm)) <= (cfg.min_decode if frm == DECODE else cfg.min_prefill):
      return None
    g = least_loaded(serving(frm))
    assert g is not None
    g.target = to
    self.controller.hold()
    if frm == PREFILL:
      self.prefills = [i for i in self.prefills if self._group[i] is not g]
      queued = [r for i in g.twins[PREFILL] for r in i.sched.take_waiting()]
      if queued:
        dest = least_loaded(self._alive(self.prefills))
        assert dest is not None, "a prefill group is left: the minimum is at least 1"
        dest.sched.merge_waiting(queued)
        self._launch(dest, now)
    else:
      self.decodes = [i for i in self.decodes if self._group[i] is not g]
      for i in g.twins[DECODE]:
        self._migrate(i, now)
    self._settle(now)
    return g.name

  def _take_queued(self, inst: Instance) -> None:
    """New prefill instance `inst` takes queued prompts, newest first, from the most
    loaded prefill instances until it is about as loaded as they are."""
    others = self._alive(self.prefills)
    while others:
      donor = max(others, key=lambda i: (i.num_waiting + i.num_running, -others.index(i)))
      if (donor.num_waiting == 0
          or donor.num_waiting + donor.num_running <= inst.num_waiting + inst.num_running + 1):
        return
      inst.sched.merge_waiting([donor.sched.take_newest()])

  def _migrate(self, inst: Instance, now: float) -> None:
    """Moves what draining decode instance `inst` holds (between its steps) to other
    decode instances that have pages for it, oldest first."""
    if inst.step is not None:
      return
    decodes = self._alive(self.decodes)
    for r in sorted(inst.sched.admitted, key=lambda r: r.admitted_seq):
      dst = least_loaded(decodes, lambda d: d.sched.can_accept(r))
      if dst is None:
        return  # decode memory is full: the rest decode here meanwhile
      inst.sched.detach(r)
      self._reserve(r, inst, dst)  # the copy skips what dst's cache holds
      self.ex.start_copy(r, inst, dst, now)

  # -- the moves --------------------------------------------------------------------

  def _launch(self, inst, now):
    twin = self._twin.get(inst)
    if twin is not None and twin.step is not None:
      return False  # one device: its twin's step runs; it is launched when that ends
    return super()._launch(inst, now)

  def _after_step(self, inst, finished, now, seconds):
    g = self._group[inst]
    if g.target == PREFILL:
      self._migrate(inst, now)
    self._settle(now)  # a group drained by this step serves its new role before the pull
    super()._after_step(inst, finished, now, seconds)
    self._launch(self._twin[inst], now)

  def _observe(self, step, now: float) -> None:
    ctl = self.controller
    for c in step.prefills:
      r = c.request
      if c.last and len(r.token_times) == 1 and r.token_times[0] == now:
        ctl.first_token(r)
    for r in step.requests:
      if r.finish_time == now:
        ctl.finished(r)
    to = ctl.decide(self._count(PREFILL), self._count(DECODE))
    if to is not None:
      self.move(to, now)

  def _count(self, role: str) -> int:
    return sum(1 for g in self.groups if g.role == role and g.target is None and not g.lost)

  def _settle(self, now: float) -> None:
    """Completes the move of a drained group."""
    for g in self.groups:
      if g.target is None:
        continue
      if g.lost:
        # The move is called off: the group keeps its role and is listed for it again,
        # so it serves that role once readmitted; the controller may judge again.
        g.target = None
        listed = self.prefills if g.role == PREFILL else self.decodes
        listed += g.twins[g.role]
        listed.sort(key=self.instances.index)
        self.controller.moved(now, self._count(PREFILL), self._count(DECODE))
        continue
      old = g.twins[g.role]
      if any(i.step is not None for i in old):
        continue
      if g.role == DECODE and not all(i.sched.idle for i in old):
        continue
      g.role, g.target = g.target, None
      if g.role == DECODE:
        self.decodes += g.twins[DECODE]
        for i in old:  # its finished prompts stay in its pool: decode them there
          while (h := i.sched.peek_handoff()) is not None and self._twin[i].sched.can_adopt(h):
            self._twin[i].sched.adopt(i.sched.detach_handoff())
      else:
        for i in g.twins[PREFILL]:
          self._take_queued(i)
        self.prefills += g.twins[PREFILL]
      self.controller.moved(now, self._count(PREFILL), self._count(DECODE))
      for i in g.twins[g.role]:
        self._launch(i, now)
      self._pull(now)
