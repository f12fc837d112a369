-- Argo CD health for ragtune's FineTuneJob, VectorIndex and HybridEndpoint, read from the conditions the operator
-- writes (Kubernetes API conventions). A promotion in Git (a HybridEndpoint's new adapter reference) is
-- Progressing until the endpoint serves the new adapter, so a sync wave or a pipeline can wait for Healthy.
local hs = {status = "Progressing", message = "waiting for the operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local function is_true(kind)
  return conditions[kind] ~= nil and conditions[kind].status == "True"
end
local function say(status, condition)
  hs.status = status
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    hs.message = condition.message
  elseif condition ~= nil then
    hs.message = condition.reason
  end
  return hs
end
local ready = conditions["Ready"]
if ready == nil then
  return hs
end
-- The operator has not reported on the latest spec yet.
local generation = obj.metadata.generation
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.message = "the operator has not reported on generation " .. generation .. " yet"
  return hs
end
if is_true("Failed") then
  return say("Degraded", conditions["Failed"])
end
-- An index serves its active version while it indexes the next (a scheduled refresh too): Healthy.
if obj.kind == "VectorIndex" and ready.status == "True" then
  return say("Healthy", ready)
end
if is_true("Progressing") then
  return say("Progressing", conditions["Progressing"])
end
if ready.status == "True" then
  if ready.reason == "ScaledToZero" then
    return say("Suspended", ready)
  end
  return say("Healthy", ready)
end
return say("Degraded", ready)
