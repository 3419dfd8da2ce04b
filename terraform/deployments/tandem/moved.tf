################################################################################
# Addresses of the flat layout, before modules/region
#
# Each region's modules used to be called here directly (module.rds_region1,
# module.lambda_read_region2, ...). These blocks move an existing state's
# objects to their address in the region modules, so the first plan after the
# change shows moves, not destroys and creates (a new database, cache, cluster
# and load balancer). Keep them while any state may still have the old
# addresses; removing one later only loses the move, never an object.
################################################################################

# Region 1

moved {
  from = module.kms_region1
  to   = module.region1.module.kms
}

moved {
  from = module.network_region1
  to   = module.region1.module.network
}

moved {
  from = module.eks_region1
  to   = module.region1.module.eks
}

moved {
  from = module.rds_region1
  to   = module.region1.module.rds
}

moved {
  from = module.elasticache_region1
  to   = module.region1.module.elasticache
}

moved {
  from = module.iam_region1
  to   = module.region1.module.iam
}

moved {
  from = module.lambda_write_region1
  to   = module.region1.module.lambda_write
}

moved {
  from = module.lambda_read_region1
  to   = module.region1.module.lambda_read
}

moved {
  from = module.alb_region1
  to   = module.region1.module.alb
}

# Region 2

moved {
  from = module.kms_region2
  to   = module.region2.module.kms
}

moved {
  from = module.network_region2
  to   = module.region2.module.network
}

moved {
  from = module.eks_region2
  to   = module.region2.module.eks
}

moved {
  from = module.rds_region2
  to   = module.region2.module.rds
}

moved {
  from = module.elasticache_region2
  to   = module.region2.module.elasticache
}

moved {
  from = module.iam_region2
  to   = module.region2.module.iam
}

moved {
  from = module.lambda_read_region2
  to   = module.region2.module.lambda_read
}

moved {
  from = module.lambda_apply_region2
  to   = module.region2.module.lambda_apply
}

moved {
  from = module.alb_region2
  to   = module.region2.module.alb
}
