#!/usr/bin/env bash
# The Fargate image that staging deployed, carried to production byte for byte (deploy.yml).
#
#   infra/ci/image.sh save CDK_OUT DIR   staging, after `cdk deploy`: DIR/image-digest.txt holds the image
#                                        asset's tag and the digest staging's ECR has for it, DIR/image
#                                        the image itself (manifest and layers as pushed: skopeo's dir:)
#   infra/ci/image.sh load CDK_OUT DIR   production, before `cdk deploy`: pushes DIR/image under the same
#                                        tag, then fails unless production's ECR has that very digest
#
# `cdk deploy` builds an image asset only when the bootstrap repository lacks its tag (the hash of the
# build context), so once `load` has pushed staging's image production's deploy uses it as is. A
# rebuild would not be the same image: the base image, pip and the layers' timestamps all change it.
# Needs the AWS CLI, jq and skopeo (all on GitHub's ubuntu runners), and AWS_REGION.
set -euo pipefail
mode=$1 cdk_out=$2 dir=$3
region=${AWS_REGION:?AWS_REGION is not set}
account=$(aws sts get-caller-identity --query Account --output text)
partition=$(aws sts get-caller-identity --query Arn --output text | cut -d: -f2)
mkdir -p "$dir"

# The assembly's image asset (this stack has at most one: the Fargate runner's).
images=$(jq -c '[.dockerImages // {} | to_entries[] | .value.destinations | to_entries[] | .value]' \
  "$cdk_out"/*.assets.json | jq -cs 'add')
if [ "$(jq length <<<"$images")" = 0 ]; then
  echo "no image asset in $cdk_out (the Glue runner)"
  [ "$mode" = save ] && echo "none" >"$dir/image-digest.txt"
  exit 0
fi
[ "$(jq length <<<"$images")" = 1 ] || { echo "more than one image asset in $cdk_out" >&2; exit 1; }
fill() { sed -e "s/\${AWS::AccountId}/$account/g" -e "s/\${AWS::Region}/$region/g" -e "s/\${AWS::Partition}/$partition/g"; }
tag=$(jq -r '.[0].imageTag' <<<"$images")
repo=$(jq -r '.[0].repositoryName' <<<"$images" | fill)
role=$(jq -r '.[0].assumeRoleArn' <<<"$images" | fill)
registry="$account.dkr.ecr.$region.amazonaws.com"

# The bootstrap's image-publishing role, which cdk-assets pushes with (the deploy role may assume it).
creds=$(aws sts assume-role --role-arn "$role" --role-session-name image-digest --query Credentials --output json)
AWS_ACCESS_KEY_ID=$(jq -r .AccessKeyId <<<"$creds")
AWS_SECRET_ACCESS_KEY=$(jq -r .SecretAccessKey <<<"$creds")
AWS_SESSION_TOKEN=$(jq -r .SessionToken <<<"$creds")
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
aws ecr get-login-password | skopeo login --username AWS --password-stdin "$registry"
digest_of() {
  aws ecr describe-images --repository-name "$repo" --image-ids imageTag="$tag" \
    --query 'imageDetails[0].imageDigest' --output text 2>/dev/null || true
}

case $mode in
  save)
    digest=$(digest_of)
    case $digest in sha256:*) ;; *) echo "$repo has no image tagged $tag after the deploy" >&2; exit 1 ;; esac
    # --preserve-digests: the copy must be these bytes, or fail.
    skopeo copy --all --preserve-digests "docker://$registry/$repo@$digest" "dir:$dir/image"
    echo "$tag $digest" >"$dir/image-digest.txt"
    echo "staging's image: $repo:$tag $digest"
    ;;
  load)
    read -r want_tag digest <"$dir/image-digest.txt"
    [ "$want_tag" = "$tag" ] || { echo "the assembly's image is $tag, staging recorded $want_tag" >&2; exit 1; }
    case $(digest_of) in
      sha256:*) echo "production already has $repo:$tag" ;;
      *) skopeo copy --all --preserve-digests "dir:$dir/image" "docker://$registry/$repo:$tag" ;;
    esac
    have=$(digest_of)
    if [ "$have" != "$digest" ]; then
      echo "production's $repo:$tag is $have, staging deployed $digest: not deploying a different image" \
        "(an older build of the same context? delete that tag from the repository and rerun)" >&2
      exit 1
    fi
    echo "production's image: $repo:$tag $digest (staging's)"
    ;;
  *) echo "usage: $0 save|load CDK_OUT DIR" >&2; exit 2 ;;
esac
