-- Orthanc: send each new stable CT, CR or DX study to the ainode AI node, exactly once.
--
-- The node answers with SR and SEG objects in the same study. They make the study
-- stable again, so the study carries the user metadata "AinodeRouted" once it has
-- been routed, and only series of the routable modalities that the node did not
-- produce (Manufacturer "ainode") are ever sent. Nothing comes back to the node.
--
-- Needs in orthanc.json: "UserMetadata": { "AinodeRouted": 1024 }, the node in
-- "DicomModalities" under the name in NODE, and "LuaScripts": [ "<this file>" ].

local NODE = 'ainode'
local ROUTABLE = { CT = true, CR = true, DX = true }
local MARK = 'AinodeRouted'

local function routed(studyId)
  local ok, value = pcall(RestApiGet, '/studies/' .. studyId .. '/metadata/' .. MARK, false)
  return ok and value ~= nil and value ~= ''
end

local function ours(series)
  local manufacturer = series['MainDicomTags']['Manufacturer'] or ''
  return string.lower(manufacturer) == 'ainode'
end

function OnStableStudy(studyId, tags, metadata)
  if routed(studyId) then
    return
  end
  local resources = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local modality = series['MainDicomTags']['Modality'] or ''
    if ROUTABLE[modality] and not ours(series) then
      table.insert(resources, series['ID'])
    end
  end
  if #resources == 0 then
    return  -- nothing for the node (e.g. a study holding only results)
  end
  -- Mark first: a study is offered once even if the store job must be retried by hand
  -- (Orthanc's job list shows it).
  RestApiPut('/studies/' .. studyId .. '/metadata/' .. MARK, 'yes', false)
  RestApiPost('/modalities/' .. NODE .. '/store',
              DumpJson({ Resources = resources, Synchronous = false }, true), false)
  print('ainode autoroute: study ' .. studyId .. ': ' .. #resources .. ' series sent to ' .. NODE)
end
