-- Argo CD health check for serin.dev/Rollout (install: docs/gitops.md).
-- Written for Lua 5.1, the dialect of Argo CD's interpreter. A status computed from an older spec says
-- nothing about the current one, so observedGeneration is checked before anything else.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message(status, fallback)
  if status.message ~= nil and status.message ~= "" then
    return status.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Serin controller to observe the rollout"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or tonumber(status.observedGeneration) < tonumber(generation)) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Serin controller to observe the latest spec"
  return hs
end

local invalid = condition(status, "InvalidSpec")
if invalid ~= nil and invalid.status == "True" then
  hs.status = "Degraded"
  hs.message = invalid.message or message(status, "The rollout's spec is invalid")
  return hs
end

local phase = status.phase
if phase == "Healthy" then
  hs.status = "Healthy"
  hs.message = message(status, "The rollout is complete and healthy")
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = message(status, "The rollout is paused")
elseif phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = message(status, "The rollout is degraded")
elseif phase == "Aborted" then
  hs.status = "Degraded"
  hs.message = message(status, "The rollout was aborted; all traffic is on the stable version")
else
  hs.status = "Progressing"
  hs.message = message(status, "The rollout is progressing")
end
return hs
