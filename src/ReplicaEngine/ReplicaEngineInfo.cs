namespace NbdServer.ReplicaEngine;

/// <summary>Placeholder until the replica engine lands (issue: Replica engine).</summary>
internal static class ReplicaEngineInfo
{
    public const string Name = "replica-engine";
}
